def analyze(image): raise NotImplementedError
def match(a, b): raise NotImplementedError
