//! The inverse of `arbitrary`'s derived decoding, for writing seed inputs by hand.
//!
//! `arbitrary` 1.x (the version pinned in `fuzz/Cargo.lock`) decodes:
//!
//! - integers as little-endian bytes (missing bytes read as zero), `bool` as `u8 & 1`;
//! - a derived struct as its fields in order;
//! - a derived enum as a `u32` `x` choosing variant `(x * n) >> 32` of `n`, then its fields;
//! - `Vec<T>` and `Option<T>` as "one more?" bytes (`bool`) each followed by an element,
//!   the vector ending at a `false` byte or the end of the input.
//!
//! The input types are declared with [`fuzz_struct!`] and [`fuzz_enum!`], which derive
//! `Arbitrary` and implement [`Encode`] from the same field list, so the two cannot drift
//! apart; `tests::roundtrip` checks `decode(encode(x)) == x` for every seed.

/// Serialise a value into the bytes `arbitrary` decodes back into it.
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);

    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self as u8);
    }
}

impl Encode for () {
    fn encode(&self, _: &mut Vec<u8>) {}
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for x in self {
            out.push(1);
            x.encode(out);
        }
        out.push(0);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(x) => {
                out.push(1);
                x.encode(out);
            }
        }
    }
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

/// The `u32` that makes a derived enum of `n` variants pick variant `i`.
pub fn variant_selector(i: u32, n: u32) -> u32 {
    let x = ((i as u64) << 32).div_ceil(n as u64);
    debug_assert_eq!((x * n as u64) >> 32, i as u64);
    x as u32
}

/// A struct that derives `Arbitrary` and implements [`Encode`] field by field.
#[macro_export]
macro_rules! fuzz_struct {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $fvis:vis $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(arbitrary::Arbitrary, Debug, Clone, PartialEq, Eq)]
        $vis struct $name { $($(#[$fm])* $fvis $field: $ty),* }

        impl $crate::encode::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $($crate::encode::Encode::encode(&self.$field, out);)*
            }
        }
    };
}

/// An enum whose variants each hold exactly one value (`()` for none) that derives
/// `Arbitrary` and implements [`Encode`].
#[macro_export]
macro_rules! fuzz_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $var:ident($ty:ty)),* $(,)? }) => {
        $(#[$m])*
        #[derive(arbitrary::Arbitrary, Debug, Clone, PartialEq, Eq)]
        $vis enum $name { $($(#[$vm])* $var($ty)),* }

        impl $crate::encode::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                let n = [$(stringify!($var)),*].len() as u32;
                let mut i = 0u32;
                $(
                    if let $name::$var(x) = self {
                        out.extend_from_slice(&$crate::encode::variant_selector(i, n).to_le_bytes());
                        $crate::encode::Encode::encode(x, out);
                        return;
                    }
                    i += 1;
                )*
                let _ = i;
            }
        }
    };
}
