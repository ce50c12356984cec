//! Placeholder: written by the analytics test author.
