import time, torch, json
torch.set_num_threads(1)
import rnn_fused, rnn_fused._C
res={}
for T,B,H in [(128,64,256),(256,16,128),(64,1,512),(64,64,128),(64,16,256)]:
    xw=torch.randn(T,B,1,H); w=torch.randn(1,H,H)/H**0.5; h0=torch.randn(1,B,H)
    f=lambda: torch.ops.rnn_fused.recurrence_forward(xw,w,h0,None,"tanh")
    h_all,_=f(); dh=torch.randn_like(h_all)
    b=lambda: torch.ops.rnn_fused.recurrence_backward(w,h_all,h0,dh,None,None,"tanh")
    for name,fn in (("fwd",f),("bwd",b)):
        fn(); ts=[]
        t_end=time.perf_counter()+0.4
        while time.perf_counter()<t_end or len(ts)<5:
            t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
        ts.sort(); res[f"T{T} B{B} H{H} {name}"]=(ts[0]*1e3, ts[len(ts)//2]*1e3)
print(json.dumps(res))
