"""Layer 10, the store: tidy result rows (one per run, schema-versioned, append-only),
the matrix record beside them, and the output paths checked before any work starts.

May import: base.
"""
