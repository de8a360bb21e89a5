//! strongSwan's charon in a network namespace: the IPsec peers of the tests (a backend, a
//! client) and the gateway's own, which the relay drives.
//!
//! This kernel has no ESP, so charon does ESP in userspace over a TUN device
//! (`kernel-libipsec`, ESP in userspace over TUN `ipsec0`), as `shared/spike/IPSEC.md` found:
//! - each instance gets its own `strongswan.conf` (`STRONGSWAN_CONF`) and its own mount
//!   namespace with a tmpfs on `/run`, where charon's fixed pid file lives;
//! - IKE packets carry mark 0x42 and so skip table 220, which routes into `ipsec0`;
//! - `kdf` and the hash plugins are loaded, or key derivation fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// The mark of charon's IKE packets (`socket-default.fwmark`), the relay's `ike_mark`.
pub const IKE_MARK: u32 = 0x42;

pub struct Charon {
    /// Its strongswan.conf, swanctl.conf, `private/` keys, log and VICI socket.
    pub dir: PathBuf,
    pub vici: PathBuf,
    ns: String,
    child: Option<Child>,
}

impl Charon {
    /// Starts charon in `ns`, its files in `dir`; returns once its VICI socket answers.
    pub fn start(ns: &str, dir: &Path) -> anyhow::Result<Charon> {
        std::fs::create_dir_all(dir.join("private"))?;
        let vici = dir.join("charon.vici");
        let _ = std::fs::remove_file(&vici);
        let conf = dir.join("strongswan.conf");
        std::fs::write(
            &conf,
            format!(
                "charon {{\n\
                 \x20 load = random nonce aes sha1 sha2 hmac kdf gcm curve25519 openssl pem pkcs1 \
                 pkcs8 x509 revocation constraints pubkey socket-default kernel-libipsec \
                 kernel-netlink vici updown\n\
                 \x20 install_routes = yes\n\
                 \x20 plugins {{\n\
                 \x20   vici {{ socket = unix://{vici} }}\n\
                 \x20   kernel-libipsec {{ allow_peer_ts = yes }}\n\
                 \x20   socket-default {{ fwmark = {IKE_MARK:#x} }}\n\
                 \x20   kernel-netlink {{ fwmark = !{IKE_MARK:#x} }}\n\
                 \x20 }}\n\
                 \x20 filelog {{ log {{ path = {log}\n default = 1\n ike = 2\n cfg = 2 }} }}\n\
                 }}\n",
                vici = vici.display(),
                log = dir.join("charon.log").display(),
            ),
        )?;
        let out = std::fs::File::create(dir.join("out.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "-m", "sh", "-c"])
            .arg("mount -t tmpfs tmpfs /run && exec /usr/lib/ipsec/charon")
            .env("STRONGSWAN_CONF", &conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start charon (apt install strongswan-charon: `cargo xtask setup`)")?;
        let mut charon = Charon {
            dir: dir.to_path_buf(),
            vici,
            ns: ns.to_string(),
            child: Some(child),
        };
        let up = crate::wait_until(Duration::from_secs(10), || {
            charon
                .swanctl(&["--stats"])
                .is_ok_and(|o| o.status.success())
        });
        if !up {
            let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
            charon.kill();
            bail!("charon in {ns} did not answer on {}: {log}", dir.display());
        }
        Ok(charon)
    }

    /// `swanctl <args> --uri <its VICI socket>`.
    pub fn swanctl(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("swanctl")
            .args(args)
            .arg("--uri")
            .arg(format!("unix://{}", self.vici.display()))
            .output()
    }

    /// Loads `conf` (swanctl.conf syntax) with the private key `key`.
    pub fn load(&self, conf: &str, key: &Path) -> anyhow::Result<()> {
        std::fs::copy(key, self.dir.join("private/key.pem"))?;
        let file = self.dir.join("swanctl.conf");
        std::fs::write(&file, conf)?;
        let out = self.swanctl(&["--load-all", "--file", file.to_str().unwrap()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("failed") {
            bail!(
                "swanctl --load-all in {}: {text}{}",
                self.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Brings up CHILD_SA `child` now (as its initiator).
    pub fn initiate(&self, child: &str) -> anyhow::Result<()> {
        let out = self.swanctl(&["--initiate", "--child", child, "--timeout", "10"])?;
        if !out.status.success() {
            bail!(
                "swanctl --initiate {child} in {}: {}{}",
                self.ns,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Its log (`charon.log`), for assertions and failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    /// Kills charon at once (SIGKILL, by PID), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A swanctl.conf connection `name` with certificate authentication both ways.
pub struct Conn<'a> {
    pub name: &'a str,
    pub local_addrs: &'a str,
    pub remote_addrs: &'a str,
    pub cert: &'a Path,
    pub id: &'a str,
    pub remote_id: &'a str,
    pub cacert: &'a Path,
    pub local_ts: &'a str,
    pub remote_ts: &'a str,
}

impl Conn<'_> {
    pub fn render(&self) -> String {
        format!(
            "connections {{\n {name} {{\n  version = 2\n  local_addrs = {la}\n  \
             remote_addrs = {ra}\n  proposals = aes256gcm16-prfsha384-x25519\n  \
             local {{\n   auth = pubkey\n   certs = {cert}\n   id = \"{id}\"\n  }}\n  \
             remote {{\n   auth = pubkey\n   id = \"{rid}\"\n   cacerts = {ca}\n  }}\n  \
             children {{\n   {name} {{\n    local_ts = {lts}\n    remote_ts = {rts}\n    \
             esp_proposals = aes256gcm16-x25519\n   }}\n  }}\n }}\n}}\n",
            name = self.name,
            la = self.local_addrs,
            ra = self.remote_addrs,
            cert = self.cert.display(),
            id = self.id,
            rid = self.remote_id,
            ca = self.cacert.display(),
            lts = self.local_ts,
            rts = self.remote_ts,
        )
    }
}
