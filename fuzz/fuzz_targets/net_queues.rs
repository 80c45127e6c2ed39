//! virtio-net's queue-pair worker against a guest that writes anything into its rings
//! and buffers: see `devices::virtio::net::fuzz::net_queues` for the input's layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::net::fuzz::net_queues(data));
