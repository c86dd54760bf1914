//! The cluster and Sentinel harness itself (see `common/cluster.rs`): it forms
//! a healthy 3+3 cluster and a monitored primary/replica, and a killed primary
//! is replaced, so the gateway tests built on it start from known ground.

mod common;

use common::cluster::{RedisCluster, RedisSentinel, SENTINEL_MASTER};

#[test]
fn cluster_forms_with_three_primaries_and_fails_over_when_one_dies() {
    let mut cluster = RedisCluster::start();
    assert_eq!(cluster.nodes.len(), 6);
    assert_eq!(cluster.primaries().len(), 3, "3 primaries, 3 replicas");
    assert!(cluster.urls().iter().all(|u| !u.contains(":6379/")), "never the shared port");

    let killed = cluster.kill_primary_of("kg:{k1}:key");
    assert!(!cluster.nodes[killed].is_running());
    let window = cluster.wait_for_promotion();
    let now_serving = cluster.primary_index_of("kg:{k1}:key");
    assert_ne!(now_serving, killed, "a replica took over the slot");
    assert!(cluster.nodes[now_serving].is_primary());
    eprintln!("cluster promotion took {window:?}");
}

#[test]
fn sentinel_names_the_primary_and_promotes_the_replica_when_it_dies() {
    let mut setup = RedisSentinel::start();
    assert_eq!(setup.sentinel_urls().len(), 3);
    let addr: Vec<String> = setup.sentinels[0]
        .query(redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(SENTINEL_MASTER))
        .unwrap();
    assert_eq!(addr[1], setup.primary.port.to_string());
    assert!(!setup.replica.is_primary());

    setup.kill_primary();
    let window = setup.wait_for_failover();
    assert!(setup.replica.is_primary());
    eprintln!("sentinel failover took {window:?}");
}
