"""Durations as progress lines and ETAs print them (4m05s, 1h02m), alike in every command."""


def format_duration(seconds):
  """`seconds` as minutes and seconds ('4m05s'), or from an hour on hours and minutes ('1h02m')."""
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"
