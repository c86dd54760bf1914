#![allow(dead_code)]
//! Helpers shared by the integration tests: real servers on ephemeral ports.
//!
//! Each test binary includes this with `mod common;` and uses what it needs
//! (hence `dead_code` allowed: not every binary uses every helper).

pub mod redis;
