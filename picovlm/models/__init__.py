"""Model components, one file each: vision_cnn (pixels -> visual tokens), gpt2 (decoder blocks),
supravl (the fused model: visual tokens + text -> next-token logits)."""
