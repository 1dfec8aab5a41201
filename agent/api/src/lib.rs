//! Hull agent API (being written).
