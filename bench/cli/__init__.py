"""Layer 1 (top), the command line: ``trickbench`` / ``python -m bench``. Parsing and printing only.

main.py wires the verbs and runs ``run``/``list``; args.py holds the argument types every verb
shares; judging.py, diagnostics.py, cluster.py and history.py add their verbs' options. Each verb's work
lives with the code it runs, in the layers below.

May import: every layer below.
"""
