"""What every stage shares: file and flag names, error types, value checks,
atomic output files.
"""
