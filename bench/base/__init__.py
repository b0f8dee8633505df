"""Layer 11 (bottom), what every layer uses: name registries with did-you-mean, safe YAML
reading, and the one kind of user error (ConfigError) with text that never grows with its input.

May import: nothing of bench.
"""
