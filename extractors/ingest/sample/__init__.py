"""The embedded sample: a deterministic SmolTalk-schema dataset (`generate`), one generator per
category (`categories`) and the word lists they draw from (`words`)."""
