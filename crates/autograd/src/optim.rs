//! Optimisers (filled in with the training issue).
