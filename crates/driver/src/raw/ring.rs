//! Raw ring access: see the module docs of [`super`].
