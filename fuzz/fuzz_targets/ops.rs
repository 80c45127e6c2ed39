//! How the targets read their input: fixed-size fields and length-prefixed runs, taken
//! from the front until the input runs out. Each target includes this file as a module.

pub struct Ops<'a>(pub &'a [u8]);

impl Ops<'_> {
    /// The next `N` bytes, or None once fewer are left.
    pub fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, b) = self.0.split_first_chunk::<N>()?;
        self.0 = b;
        Some(*a)
    }

    /// The next `n` bytes, or all that are left.
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}
