"""backer: peer-to-peer folder mirroring between one person's own computers."""
