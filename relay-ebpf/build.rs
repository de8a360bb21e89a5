//! bpf-linker is an undeclared dependency of the bpfel target: rebuild when it changes.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // Packet fields sit at any alignment (a 14-byte Ethernet header, VLAN tags, IP options).
    // Without this, LLVM splits every 2- and 4-byte read of them into single bytes; the kernel
    // allows misaligned packet access wherever the CPU does (x86, arm64), and the verifier
    // still refuses misaligned stack access, so nothing slips through unnoticed.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
