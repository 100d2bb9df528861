"""Data: flickr8k (finding and parsing caption folders), images (safe decoding, uint8 cache),
shapes (the built-in synthetic dataset), batches (training batches from the cache), prepare
(the train and dev data of a run, from any of the sources)."""
