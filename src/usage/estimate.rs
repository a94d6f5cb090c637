//! Token estimates for when a provider's usage report never arrives: one token per 4
//! characters (Unicode scalar values). This is the mock provider's tokenizer
//! (`mock/src/tokens.rs`), so tests can compare exactly; real BPE tokenizers differ. The
//! request side (the prompt estimate) counts with the same rule in `body/prompt.rs`.

/// `ceil(chars / 4)`.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chars_round_up() {
        assert_eq!(estimate_tokens_from_chars(0), 0);
        assert_eq!(estimate_tokens_from_chars(1), 1);
        assert_eq!(estimate_tokens_from_chars(4), 1);
        assert_eq!(estimate_tokens_from_chars(5), 2);
        assert_eq!(estimate_tokens_from_chars(u64::MAX), u64::MAX / 4 + 1);
    }
}
