"""The command-line layer: what every command shares, and the trainers' flags
and run set-up.
"""
