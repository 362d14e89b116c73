//! Rendezvous (highest-random-weight) hashing: a conversation lives on the live node with the highest score
//! for the pair (node, conversation).
//!
//! Every node computes the same owner from the same member list with no coordination, and when a node joins
//! or leaves only the conversations it wins or held move (about 1/N of them), unlike `hash mod N`. The hash
//! is FNV-1a with a SplitMix64 finish, written out here so that it never changes between builds or Rust
//! versions: nodes of different builds in a rolling upgrade must agree (decision 0015).

/// The node, of `nodes`, that owns `conv`; `None` when `nodes` is empty.
pub fn owner<'a, N: AsRef<str>>(conv: &str, nodes: &'a [N]) -> Option<&'a N> {
    // Ties (astronomically unlikely) go to the greater name, so every node still agrees.
    nodes.iter().max_by(|a, b| {
        let (a, b) = (a.as_ref(), b.as_ref());
        score(a, conv).cmp(&score(b, conv)).then_with(|| a.cmp(b))
    })
}

/// The weight of `node` for `conv`.
pub fn score(node: &str, conv: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(conv.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64's finaliser spreads FNV's weak low bits over the whole word.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convs() -> impl Iterator<Item = String> {
        (0..3000).map(|i| format!("c_{i:05}"))
    }

    #[test]
    fn spreads_evenly_and_is_stable() {
        let nodes = ["n1", "n2", "n3"];
        let mut counts = [0usize; 3];
        for c in convs() {
            let o = owner(&c, &nodes).unwrap();
            counts[nodes.iter().position(|n| n == o).unwrap()] += 1;
            assert_eq!(owner(&c, &nodes), owner(&c, &["n3", "n1", "n2"].map(|n| n)));
        }
        for n in counts {
            assert!((800..1200).contains(&n), "uneven spread: {counts:?}");
        }
        assert_eq!(score("n1", "c"), score("n1", "c"));
        assert_ne!(score("n1", "c"), score("n2", "c"));
    }

    #[test]
    fn only_the_lost_nodes_conversations_move() {
        let all = ["n1", "n2", "n3"];
        let left = ["n1", "n3"];
        for c in convs() {
            let before = *owner(&c, &all).unwrap();
            let after = *owner(&c, &left).unwrap();
            if before != "n2" {
                assert_eq!(before, after, "{c} moved though its node stayed");
            }
        }
        assert!(owner::<&str>("c", &[]).is_none());
    }
}
