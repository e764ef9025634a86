//! Enums that workflows name with a string (`reference="hint"`): one declaration gives the
//! variants, the names the checker accepts and the parser, so the schema's choice list and the
//! code that acts on it cannot drift apart.

/// A property value chosen by name.
pub trait Choice: Sized + Copy + 'static {
    /// The names, in declaration order.
    const NAMES: &'static [&'static str];
    fn parse(name: &str) -> Option<Self>;
}

/// Declares an enum whose variants are chosen by name:
/// `choice! { pub enum Mode { Off = "off", Hint = "hint" } }` gives `Mode::NAMES` (the schema's
/// `ValueType::Choice` list), `Mode::parse`, `Mode::name` and `Mode::all`.
#[macro_export]
macro_rules! choice {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        #[allow(dead_code)]
        impl $name {
            /// The names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Every variant, in declaration order.
            pub fn all() -> Vec<Self> {
                vec![$(Self::$variant),+]
            }
        }

        impl $crate::choice::Choice for $name {
            const NAMES: &'static [&'static str] = $name::NAMES;
            fn parse(name: &str) -> Option<Self> {
                Self::parse(name)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::choice! {
        enum Mode { Off = "off", Hint = "hint" }
    }

    #[test]
    fn names_parse_back_to_their_variants() {
        assert_eq!(Mode::NAMES, ["off", "hint"]);
        for name in Mode::NAMES {
            assert_eq!(Mode::parse(name).map(Mode::name), Some(*name));
        }
        assert_eq!(Mode::parse("Hint"), None);
        assert_eq!(Mode::Hint.name(), "hint");
        assert_eq!(Mode::all(), [Mode::Off, Mode::Hint]);
    }
}
