RULES: list = []
