#![no_std]
// Exists so that relay can name relay-ebpf as a build-dependency (cache invalidation).
