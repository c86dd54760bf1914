//! The embedded file store (to be written).
