//! The eBPF data path: the object built from relay-ebpf, embedded in the binary.
//!
//! Transparent mode (steering and the NIC drop of backend ports) loads programs from it.

/// The eBPF object built by build.rs (aya-build, nightly, bpfel-unknown-none).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_object_has_the_xdp_program() {
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("embedded eBPF object parses");
        assert!(
            obj.programs.contains_key("relay_xdp"),
            "programs: {:?}",
            obj.programs.keys()
        );
    }
}
