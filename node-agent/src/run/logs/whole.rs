//! Values a long line is never cut through: a line longer than the piece size is split, and a
//! secret that straddled the cut would reach the scheduler as two halves, neither of which its
//! redaction recognises. So the cut moves back to where such a value starts (it then opens the
//! next piece, whole). The run's environment values are the candidates (the agent does not know
//! which are secret; keeping any value whole costs nothing).
//!
//! Finding an occurrence that spans the cut is a substring search in a window of twice the
//! value's length around it, with Knuth–Morris–Pratt so a 32 KiB value costs linear time; the
//! search's final state also says whether the buffer *ends* in the start of the value (the rest
//! not read yet), which counts as spanning the cut too.

/// Shorter values are not kept whole: the scheduler does not redact them either.
pub const MIN_LEN: usize = 4;

/// One value with its KMP failure table.
#[derive(Debug, Clone)]
pub struct Whole {
    needle: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `needle[..=i]` that is also its suffix.
    fail: Vec<usize>,
}

impl Whole {
    pub fn new(needle: &[u8]) -> Whole {
        let mut fail = vec![0; needle.len()];
        let mut k = 0;
        for i in 1..needle.len() {
            while k > 0 && needle[i] != needle[k] {
                k = fail[k - 1];
            }
            if needle[i] == needle[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Whole {
            needle: needle.to_vec(),
            fail,
        }
    }

    /// The earliest start `s` in `from+1 .. end` of an occurrence of the value that a cut at
    /// `end` would split (it runs past `end`, or past the end of `buf`, not yet read).
    fn spanning(&self, buf: &[u8], from: usize, end: usize) -> Option<usize> {
        let len = self.needle.len();
        if len < 2 {
            return None;
        }
        let lo = (from + 1).max(end.saturating_sub(len - 1));
        let hi = buf.len().min(end + len - 1);
        let mut q = 0;
        for (i, &b) in buf.iter().enumerate().take(hi).skip(lo) {
            while q > 0 && b != self.needle[q] {
                q = self.fail[q - 1];
            }
            if b == self.needle[q] {
                q += 1;
            }
            if q == len {
                let s = i + 1 - len;
                if s < end && s + len > end {
                    return Some(s);
                }
                q = self.fail[q - 1];
            }
        }
        // The buffer ends inside a possible occurrence that started before the cut.
        if hi == buf.len() && q > 0 {
            let s = buf.len() - q;
            if s < end && s >= lo {
                return Some(s);
            }
        }
        None
    }
}

/// The candidates among a run's environment values.
pub fn from_values<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Whole> {
    values
        .into_iter()
        .filter(|v| v.len() >= MIN_LEN)
        .map(|v| Whole::new(v.as_bytes()))
        .collect()
}

/// Moves a cut at `end` (of a piece starting at `start`) back so that it splits none of
/// `values`; a value too long to fit after `start` is left as it is.
pub fn cut_before(buf: &[u8], start: usize, mut end: usize, values: &[Whole]) -> usize {
    loop {
        let earliest = values
            .iter()
            .filter_map(|w| w.spanning(buf, start, end))
            .min();
        match earliest {
            Some(s) if s > start && s < end => end = s,
            _ => return end,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_spanning(buf: &[u8], needle: &[u8], from: usize, end: usize) -> Option<usize> {
        ((from + 1)..end).find(|&s| {
            let avail = &buf[s..buf.len().min(s + needle.len())];
            needle.starts_with(avail)
                && s + needle.len() > end
                && (avail.len() == needle.len() || s + avail.len() == buf.len())
        })
    }

    #[test]
    fn a_value_across_the_cut_moves_it_to_the_value_start() {
        let buf = b"xxxxxxSECRETVALUExxxxxx";
        let w = from_values(["SECRETVALUE"]);
        assert_eq!(cut_before(buf, 0, 10, &w), 6);
        // Not spanning: the cut stays.
        assert_eq!(cut_before(buf, 0, 6, &w), 6);
        assert_eq!(cut_before(buf, 0, 17, &w), 17);
        assert_eq!(cut_before(buf, 0, 20, &w), 20);
        // The value at the very start of the piece cannot move anywhere: left.
        assert_eq!(cut_before(buf, 6, 10, &w), 10);
    }

    #[test]
    fn the_start_of_a_value_at_the_end_of_what_was_read_counts() {
        let buf = b"aaaaaaaaSECR";
        let w = from_values(["SECRETVALUE"]);
        assert_eq!(cut_before(buf, 0, 10, &w), 8);
        assert_eq!(cut_before(b"aaaaaaaaSEXX", 0, 10, &w), 10);
    }

    #[test]
    fn overlapping_values_and_periodic_ones_are_found() {
        let w = from_values(["abab", "babc"]);
        let buf = b"zzzzababcqq";
        // "abab" at 4..8 and "babc" at 5..9; a cut at 7 splits both: the earliest start wins.
        assert_eq!(cut_before(buf, 0, 7, &w), 4);
        let w = from_values(["aaab"]);
        assert_eq!(cut_before(b"aaaaaaab", 0, 6, &w), 4);
    }

    /// Against a naive search over many random buffers.
    #[test]
    fn agrees_with_a_naive_search() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2_000 {
            let len = 8 + (next() % 40) as usize;
            let buf: Vec<u8> = (0..len).map(|_| b"ab"[(next() % 2) as usize]).collect();
            let nlen = 2 + (next() % 6) as usize;
            let needle: Vec<u8> = (0..nlen).map(|_| b"ab"[(next() % 2) as usize]).collect();
            let from = (next() % 4) as usize;
            let end = from + 1 + (next() as usize % (len - from - 1));
            let w = Whole::new(&needle);
            assert_eq!(
                w.spanning(&buf, from, end),
                naive_spanning(&buf, &needle, from, end),
                "buf {:?} needle {:?} from {from} end {end}",
                String::from_utf8_lossy(&buf),
                String::from_utf8_lossy(&needle)
            );
        }
    }
}
