//! Splitting a pipeline that spans Redis Cluster slots into one pipeline per
//! slot, so every part can keep pipelining whatever the topology.
//!
//! The cluster client sends a pipeline to one node and refuses one whose
//! keys hash to different slots. Several of keygate's pipelines span
//! clients, and so slots: a usage flush (one `MULTI`/`EXEC` per client, many
//! clients per round trip), the top-clients sets (one key per day), the
//! client list (one `HGETALL` per client). Rather than each part learning
//! about slots, the cluster connection cuts such a pipeline into units (a
//! `MULTI` ... `EXEC` block, which must stay whole and in one slot, or a
//! single command), groups the units by the slot of their first key, sends
//! the groups concurrently and puts the replies back in the original order.
//! Nothing in a group spans slots; a transaction whose keys span slots is
//! still refused by Redis (`CROSSSLOT`), as it must be.

use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline};

/// One slot's share of a pipeline: its commands, and for each the index of
/// its reply in the original pipeline's replies.
pub struct Group {
    pub pipeline: Pipeline,
    pub replies: Vec<usize>,
}

/// `pipeline` cut into per-slot groups, or `None` when it needs no cutting
/// (atomic as a whole, a partial reply range, or all in one slot).
pub fn split(pipeline: &Pipeline, offset: usize, count: usize) -> Option<Vec<Group>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    if pipeline.is_transaction() || offset != 0 || count != commands.len() {
        return None;
    }
    // Units: (slot of the first key in it, its command indices).
    let mut units: Vec<(Option<Slot>, Vec<usize>)> = Vec::new();
    let mut in_transaction = false;
    for (index, cmd) in commands.iter().enumerate() {
        let name = name(cmd);
        let key = key(cmd, &name);
        match units.last_mut() {
            Some((slot, members)) if in_transaction => {
                members.push(index);
                if slot.is_none() {
                    *slot = key.map(Slot::for_key);
                }
            }
            _ => units.push((key.map(Slot::for_key), vec![index])),
        }
        match name.as_slice() {
            b"MULTI" => in_transaction = true,
            b"EXEC" | b"DISCARD" => in_transaction = false,
            _ => {}
        }
    }
    let first = units.first().map(|(slot, _)| *slot)?;
    if units.iter().all(|(slot, _)| *slot == first) {
        return None;
    }
    // Groups in order of first appearance; keyless units go with the first.
    let mut groups: Vec<(Option<Slot>, Group)> = Vec::new();
    for (slot, members) in units {
        let slot = slot.or(first);
        let at = match groups.iter().position(|(s, _)| *s == slot) {
            Some(at) => at,
            None => {
                groups.push((slot, Group { pipeline: redis::pipe(), replies: Vec::new() }));
                groups.len() - 1
            }
        };
        let group = &mut groups[at].1;
        for index in members {
            group.pipeline.add_command(commands[index].clone());
            group.replies.push(index);
        }
    }
    Some(groups.into_iter().map(|(_, group)| group).collect())
}

/// The command's name, upper-cased.
fn name(cmd: &Cmd) -> Vec<u8> {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => name.to_ascii_uppercase(),
        _ => Vec::new(),
    }
}

/// The key the cluster routes `cmd` by: the first argument for keyed
/// commands, the first of `KEYS` for scripts, none for `MULTI`, `PING`, ...
fn key<'a>(cmd: &'a Cmd, name: &[u8]) -> Option<&'a [u8]> {
    let arg = |at: usize| match cmd.args_iter().nth(at) {
        Some(redis::Arg::Simple(arg)) => Some(arg),
        _ => None,
    };
    match name {
        b"MULTI" | b"EXEC" | b"DISCARD" | b"PING" | b"PUBLISH" | b"SCRIPT" | b"INFO" => None,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            arg(2).filter(|numkeys| *numkeys != b"0").and_then(|_| arg(3))
        }
        _ => arg(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_is_left_whole() {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").cmd("HINCRBY").arg("kg:{a}:x").arg("f").arg(1).cmd("EXEC");
        pipe.cmd("HGETALL").arg("kg:{a}:y");
        assert!(split(&pipe, 0, 4).is_none());
    }

    #[test]
    fn transactions_stay_whole_and_replies_keep_their_places() {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").cmd("HINCRBY").arg("kg:{a}:x").arg("f").arg(1).cmd("EXEC"); // 0..3
        pipe.cmd("MULTI").cmd("HINCRBY").arg("kg:{b}:x").arg("f").arg(1).cmd("EXEC"); // 3..6
        pipe.cmd("HGETALL").arg("kg:{a}:y"); // 6
        let groups = split(&pipe, 0, 7).expect("two slots");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].replies, vec![0, 1, 2, 6]);
        assert_eq!(groups[1].replies, vec![3, 4, 5]);
        let names: Vec<Vec<u8>> = groups[1].pipeline.cmd_iter().map(name).collect();
        assert_eq!(names, vec![b"MULTI".to_vec(), b"HINCRBY".to_vec(), b"EXEC".to_vec()]);
    }

    #[test]
    fn scripts_route_by_their_first_key() {
        let mut script = redis::cmd("EVALSHA");
        script.arg("abc").arg(1).arg("kg:{a}:q");
        assert_eq!(key(&script, b"EVALSHA"), Some(b"kg:{a}:q".as_slice()));
        let mut keyless = redis::cmd("EVAL");
        keyless.arg("return 1").arg(0);
        assert_eq!(key(&keyless, b"EVAL"), None);
    }
}
