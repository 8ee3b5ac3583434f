"""Finding the devices of a share without configuration (LAN discovery)."""
