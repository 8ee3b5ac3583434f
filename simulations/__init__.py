"""Multi-node simulations of backer: real shares in temp dirs, in-memory sessions."""
