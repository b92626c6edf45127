//! Link settings of the eBPF object, for aya-build's build of it and a build by hand alike.
fn main() {
    // bpf-linker has LLVM expand `memcpy` "in order" unless told not to, which also keeps it
    // from expanding `memset` and `memmove`: every zeroed struct, `[0; N]` or run of zero
    // fields became a call of aya-ebpf's byte-at-a-time loop (64 iterations for a FIB
    // request on every masqueraded packet, 40 for every packet XDP passed). Expanded, they
    // are a few word stores, and the verifier walks 15% fewer instructions.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
