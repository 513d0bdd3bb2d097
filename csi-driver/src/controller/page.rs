//! Pagination of ListVolumes and ListSnapshots: the token is the offset of
//! the next entry in the listing's order (by name), so a page is a slice.
//! A token that is not one of ours is `ABORTED`, as the spec says: the CO
//! starts the listing again.

use super::Error;

/// The entries of one page and the token of the next (empty: the last).
pub fn page<T>(items: Vec<T>, max_entries: i32, token: &str) -> Result<(Vec<T>, String), Error> {
    if max_entries < 0 {
        return Err(Error::Invalid {
            field: "max_entries",
            why: format!("{max_entries} is negative"),
        });
    }
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|&n| n <= items.len())
            .ok_or_else(|| Error::BadToken(token.to_string()))?
    };
    let take = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    let end = start.saturating_add(take).min(items.len());
    let next = if end < items.len() { end.to_string() } else { String::new() };
    Ok((items.into_iter().skip(start).take(end - start).collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_their_tokens_to_the_end() {
        let items: Vec<u32> = (0..5).collect();
        let (a, t) = page(items.clone(), 2, "").unwrap();
        assert_eq!((a, t.as_str()), (vec![0, 1], "2"));
        let (b, t) = page(items.clone(), 2, &t).unwrap();
        assert_eq!((b, t.as_str()), (vec![2, 3], "4"));
        let (c, t) = page(items.clone(), 2, &t).unwrap();
        assert_eq!((c, t.as_str()), (vec![4], ""));
        let (all, t) = page(items.clone(), 0, "").unwrap();
        assert_eq!((all.len(), t.as_str()), (5, ""));
        let (none, t) = page(items.clone(), 3, "5").unwrap();
        assert!(none.is_empty() && t.is_empty());
    }

    #[test]
    fn a_foreign_token_is_aborted_and_a_negative_limit_invalid() {
        for bad in ["x", "-1", "6"] {
            assert!(matches!(page(vec![1, 2, 3, 4, 5], 1, bad), Err(Error::BadToken(_))), "{bad}");
        }
        assert!(matches!(page(vec![1], -1, ""), Err(Error::Invalid { .. })));
    }
}
