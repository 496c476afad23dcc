"""``kvlab compare``: train attention variants at matched parameters and compare what they cost and save."""
