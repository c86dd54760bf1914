//! The Redis refresh-token store on a real 3+3 Redis Cluster (see
//! `common/cluster.rs`): every script keeps to its client's slot (the crate
//! and the cluster refuse a cross-slot script), so rotation and family
//! revocation work for clients on every primary; records expire with
//! their tokens and hold no clear token.

mod common;

use std::time::Duration;

use common::cluster::RedisCluster;
use keygate::key::{KeyId, SecretHash};
use keygate::refresh::redis::RedisRefreshStore;
use keygate::refresh::{RefreshRecord, RefreshState, RefreshStore, RefreshToken, Rotation};
use keygate::store::conn::RedisConn;

fn now() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_second()).unwrap()
}

fn record(client: &str, family: &str, expires_at: u64) -> RefreshRecord {
    RefreshRecord {
        key_id: KeyId::new(client, "k1"),
        key_hash: SecretHash([7; 32]),
        scope: "read".to_owned(),
        family: family.to_owned(),
        state: RefreshState::Active,
        expires_at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_family_revocation_stay_in_each_clients_slot_on_a_cluster() {
    let cluster = RedisCluster::start();
    let conn = RedisConn::cluster(&cluster.urls(), Duration::from_secs(2)).await.unwrap();
    let store = RedisRefreshStore::new(conn, "kg:");
    let now = now();

    // Enough clients that every primary holds some.
    let clients: Vec<String> = (0..12).map(|i| format!("client-{i}")).collect();
    let mut primaries = std::collections::BTreeSet::new();
    for client in &clients {
        let first = RefreshToken::generate(client).unwrap();
        let family = format!("fam{client}");
        store.insert(&first.hash(), &record(client, &family, now + 3600)).await.unwrap();
        let key = format!("kg:{{{client}}}:refresh:{}", first.hash().to_hex());
        primaries.insert(cluster.primary_index_of(&key));

        let got = store.get(client, &first.hash(), now).await.unwrap().expect("stored");
        assert_eq!(got, record(client, &family, now + 3600));

        let second = RefreshToken::generate(client).unwrap();
        let next = record(client, "ignored: the successor joins the old family", now + 7200);
        let rotated = store.rotate(client, &first.hash(), &second.hash(), &next, now).await.unwrap();
        assert_eq!(rotated, Rotation::Rotated, "{client}");
        let used = store.get(client, &first.hash(), now).await.unwrap().unwrap();
        assert_eq!(used.state, RefreshState::Used);
        let successor = store.get(client, &second.hash(), now).await.unwrap().unwrap();
        assert_eq!((successor.state, successor.family.as_str()), (RefreshState::Active, family.as_str()));

        // The first token again: a replay, the whole family revoked.
        let third = RefreshToken::generate(client).unwrap();
        let replay = store.rotate(client, &first.hash(), &third.hash(), &next, now).await.unwrap();
        assert_eq!(replay, Rotation::Reused);
        let revoked = store.get(client, &second.hash(), now).await.unwrap().unwrap();
        assert_eq!(revoked.state, RefreshState::Revoked, "the newest descendant too");
        assert!(store.get(client, &third.hash(), now).await.unwrap().is_none(), "no successor was written");
        let again = store.rotate(client, &second.hash(), &third.hash(), &next, now).await.unwrap();
        assert_eq!(again, Rotation::Gone);

        // Redis keeps hashes with a TTL, never the token.
        let node = &cluster.nodes[cluster.primary_index_of(&key)];
        let ttl: i64 = node.query(redis::cmd("TTL").arg(&key)).unwrap();
        assert!((3590..=3600).contains(&ttl), "{key}: TTL {ttl}");
        let fam_key = format!("kg:{{{client}}}:rfam:{family}");
        let fam_ttl: i64 = node.query(redis::cmd("TTL").arg(&fam_key)).unwrap();
        assert!((7190..=7200).contains(&fam_ttl), "the family lives as long as its newest: {fam_ttl}");
        let fields: Vec<String> = node.query(redis::cmd("HVALS").arg(&key)).unwrap();
        let secret = first.expose().split_once('.').unwrap().1;
        assert!(fields.iter().all(|v| !v.contains(secret)), "{fields:?}");
    }
    assert_eq!(primaries.len(), 3, "the clients spread over every primary");

    // An expired record is not found, whatever Redis's TTL says.
    let late = RefreshToken::generate("client-0").unwrap();
    store.insert(&late.hash(), &record("client-0", "late", now + 1)).await.unwrap();
    assert!(store.get("client-0", &late.hash(), now + 1).await.unwrap().is_none());
    let next = record("client-0", "late", now + 10);
    let other = RefreshToken::generate("client-0").unwrap();
    assert_eq!(
        store.rotate("client-0", &late.hash(), &other.hash(), &next, now + 1).await.unwrap(),
        Rotation::Gone
    );
}
