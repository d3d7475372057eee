import torch, time, torch.nn.functional as F
torch.manual_seed(0)
n,s,d=8,4096,40
q,k,v=[torch.randn(1,n,s,d,requires_grad=True) for _ in range(3)]
fl=2*2*n*s*s*d
for _ in range(4):
    t=time.time(); o=F.scaled_dot_product_attention(q,k,v); o.sum().item(); tf=time.time()-t
    t=time.time(); (o*o).sum().backward(); q.grad.sum().item(); tb=time.time()-t
    print(f"fwd {tf:.3f} s ({fl/tf/1e9:.1f})  bwd {tb:.3f} s ({2.5*fl/tb/1e9:.1f})")
