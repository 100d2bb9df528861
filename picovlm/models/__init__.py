"""Model components, one file each: vision_cnn (pixels -> visual tokens, trained from scratch),
mobilenet_v2 (pixels -> visual tokens through a frozen ImageNet MobileNetV2), vit (pixels -> patch
embeddings, SigLIP's vision tower), projector (patch embeddings -> visual tokens: pixel shuffle +
Linear), gpt2 (decoder blocks), supravl (the fused model: visual tokens + text -> next-token logits)."""
