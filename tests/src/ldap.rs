//! A real OpenLDAP server (Debian's `slapd`) for the directory tests: its own configuration
//! file and database in a test directory, TLS with the test PKI's server certificate, on
//! loopback ports of its own; stopped (and started again) by the test, killed when dropped.
//!
//! The data: two users, `alice` (employeeType staff) and `bob` (contractor); the group `ops`
//! (member alice), the group `staff` (member: the group `ops`, so alice is in it through a
//! nested group) and the group `dev` (a groupOfUniqueNames, uniqueMember bob); and the entry
//! `cn=relay` the relay binds as.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{pki::Pki, wait_until};

pub const BASE: &str = "dc=example,dc=org";
pub const ADMIN: &str = "cn=admin,dc=example,dc=org";
pub const ADMIN_PASSWORD: &str = "admin-secret";
pub const RELAY_DN: &str = "cn=relay,dc=example,dc=org";
pub const RELAY_PASSWORD: &str = "relay-secret";

const LDIF: &str = "dn: dc=example,dc=org
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: cn=relay,dc=example,dc=org
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: relay
userPassword: relay-secret

dn: uid=alice,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: alice
cn: alice
sn: Alice
employeeType: staff
labeledURI: spiffe://example.org/ns/prod/sa/alice

dn: uid=bob,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: bob
cn: bob
sn: Bob
employeeType: contractor

dn: cn=ops,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: ops
member: uid=alice,ou=people,dc=example,dc=org

dn: cn=staff,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: staff
member: cn=ops,ou=groups,dc=example,dc=org

dn: cn=dev,ou=groups,dc=example,dc=org
objectClass: groupOfUniqueNames
cn: dev
uniqueMember: uid=bob,ou=people,dc=example,dc=org
";

pub struct Slapd {
    child: Option<Child>,
    conf: PathBuf,
    /// `ldaps://127.0.0.1:<port>`
    pub ldaps: String,
    /// `ldap://127.0.0.1:<port>` (StartTLS offered)
    pub ldap: String,
    ca: PathBuf,
}

impl Slapd {
    /// Writes the configuration and the data into `dir`, then starts slapd.
    pub fn start(dir: &Path, pki: &Pki) -> anyhow::Result<Slapd> {
        std::fs::create_dir_all(dir.join("db"))?;
        let server = pki.server();
        let conf = dir.join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 pidfile {dir}/slapd.pid\n\
                 argsfile {dir}/slapd.args\n\
                 modulepath /usr/lib/ldap\n\
                 moduleload back_mdb\n\
                 TLSCACertificateFile {ca}\n\
                 TLSCertificateFile {cert}\n\
                 TLSCertificateKeyFile {key}\n\
                 database mdb\n\
                 maxsize 16777216\n\
                 suffix \"{BASE}\"\n\
                 rootdn \"{ADMIN}\"\n\
                 rootpw {ADMIN_PASSWORD}\n\
                 directory {dir}/db\n\
                 access to attrs=userPassword by anonymous auth by * none\n\
                 access to * by users read by * none\n",
                dir = dir.display(),
                ca = pki.ca.display(),
                cert = server.cert.display(),
                key = server.key.display(),
            ),
        )?;
        let ldif = dir.join("data.ldif");
        std::fs::write(&ldif, LDIF)?;
        let out = Command::new("slapadd")
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&ldif)
            .output()
            .context("slapadd (Debian's slapd: `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!("slapadd: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut slapd = Slapd {
            child: None,
            conf,
            ldaps: format!("ldaps://127.0.0.1:{}", crate::free_port()),
            ldap: format!("ldap://127.0.0.1:{}", crate::free_port()),
            ca: pki.ca.clone(),
        };
        slapd.restart()?;
        Ok(slapd)
    }

    /// Starts slapd again (same data) and waits until it answers a search.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new("slapd")
            .arg("-f")
            .arg(&self.conf)
            .args(["-h", &format!("{} {}", self.ldaps, self.ldap)])
            // In the foreground (-d), so this handle is slapd itself; only errors logged.
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start slapd (Debian's slapd: `cargo xtask setup`)")?;
        self.child = Some(child);
        if !wait_until(Duration::from_secs(20), || {
            self.search("(uid=alice)").status.success()
        }) {
            bail!("slapd did not start: {:?}", self.search("(uid=alice)"));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ldapsearch` as the relay's entry, over StartTLS.
    pub fn search(&self, filter: &str) -> Output {
        Command::new("ldapsearch")
            .args([
                "-x",
                "-ZZ",
                "-H",
                &self.ldap,
                "-D",
                RELAY_DN,
                "-w",
                RELAY_PASSWORD,
            ])
            .args(["-b", BASE, filter, "dn"])
            .env("LDAPTLS_CACERT", &self.ca)
            .output()
            .expect("run ldapsearch")
    }

    /// `ldapmodify` as the administrator with this LDIF.
    pub fn modify(&self, ldif: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ldapmodify")
            .args([
                "-x",
                "-ZZ",
                "-H",
                &self.ldap,
                "-D",
                ADMIN,
                "-w",
                ADMIN_PASSWORD,
            ])
            .env("LDAPTLS_CACERT", &self.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("run ldapmodify")?;
        child.stdin.take().unwrap().write_all(ldif.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ldapmodify: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
