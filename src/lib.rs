pub mod lookup;

pub fn x() {}
