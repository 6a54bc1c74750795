"""Storage tiers (L1 CPU memory, L2 disk, remote tiers) and the chain that layers them."""
