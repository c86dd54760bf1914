//! Shared test harness: a real `redis-server` on a free port, real upstream
//! servers, the real gateway in process, and HTTP clients, all on loopback.
#![allow(dead_code)]

pub mod access;
pub mod admin;
pub mod binary;
pub mod cluster;
pub mod gateway;
pub mod logs;
pub mod pki;
pub mod raw;
pub mod redis;
pub mod relay;
pub mod rsa_fixture;
pub mod tls;
pub mod tls_upstream;
pub mod upstream;
pub mod wait;
