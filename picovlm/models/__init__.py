"""Model components, one file each: vision_cnn (pixels -> visual tokens, trained from scratch),
mobilenet_v2 (pixels -> visual tokens through a frozen ImageNet MobileNetV2), gpt2 (decoder blocks),
llama (a Llama-style decoder that loads SmolLM2; weights via picovlm.pretrained_lm),
supravl (the fused model: visual tokens + text -> next-token logits)."""
