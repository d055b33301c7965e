"""Weight-pruning methods: one file each, each a plain function over one weight matrix and its statistics."""
