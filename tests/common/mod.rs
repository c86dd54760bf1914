//! Shared test harness: real upstream servers, the real gateway in process,
//! and HTTP clients, all on ephemeral loopback ports.
#![allow(dead_code)]

pub mod gateway;
pub mod upstream;
