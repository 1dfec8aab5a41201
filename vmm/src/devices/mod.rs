//! Emulated devices. Each is a state machine reached through the [`crate::kvm::bus::Bus`]; side
//! effects (interrupts, VM exit requests) go out through small handles it is given.
pub mod legacy;
pub mod power;
pub mod virtio;
