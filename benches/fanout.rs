//! Placeholder until the end-to-end fan-out bench lands.
fn main() {}
