//! hull vmm
