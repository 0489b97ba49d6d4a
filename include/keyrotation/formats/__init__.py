"""Data formats: how encrypted data and its key material are laid out."""
