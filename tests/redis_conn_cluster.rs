//! `RedisConn` on a real 3+3 cluster (see `common/cluster.rs`): commands reach
//! every slot's primary, a one-slot pipeline works, and after a primary dies
//! the same connection serves the moved slot again without being rebuilt.

mod common;

use std::time::Duration;

use common::cluster::RedisCluster;
use keygate::store::conn::RedisConn;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_all_slots_and_survives_a_failover() {
    let mut cluster = RedisCluster::start();
    let mut conn = RedisConn::cluster(&cluster.urls(), Duration::from_secs(2)).await.unwrap();

    // 300 keys land on all three primaries.
    for i in 0..300 {
        let _: () = conn.set(format!("kg:{{k{i}}}:key"), i).await.unwrap();
    }
    for node in cluster.primaries() {
        let keys: u64 = node.query(&mut redis::cmd("DBSIZE")).unwrap();
        assert!(keys > 50, "primary {} holds {keys} keys", node.port);
    }

    // A pipeline whose keys share a hash tag stays in one slot.
    let (a, b): (i64, i64) =
        redis::pipe().incr("kg:{k7}:a", 1).incr("kg:{k7}:b", 2).query_async(&mut conn).await.unwrap();
    assert_eq!((a, b), (1, 2));

    // Kill the primary of k1's slot; once a replica is promoted the same
    // connection reads the (replicated) value back, retrying within its deadline.
    cluster.kill_primary_of("kg:{k1}:key");
    cluster.wait_for_promotion();
    let mut got = None;
    for _ in 0..20 {
        if let Ok(v) = conn.get::<_, i64>("kg:{k1}:key").await {
            got = Some(v);
            break;
        }
    }
    assert_eq!(got, Some(1), "the moved slot is served again by the same connection");
}
