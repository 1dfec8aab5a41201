//! virtio-vsock device (being written).
