//! Guest-boot harness.
