#!/usr/bin/env python3
"""llama-server alone: one request per sample against the API's `n` (one request per task, the
prompt decoded once and copied to child slots), each with and without log-probabilities. 8
slots, 4 MBPP prompts x 5 samples of exactly 128 tokens (`ignore_eos`), two rounds; prints
tokens/s. Decided whether seedflow's server client uses `n` (it does not: README, "On an
inference server").

    python3 bench/server_n.py
"""
import json, subprocess, time, urllib.request, socket
from concurrent.futures import ThreadPoolExecutor
from generate import MBPP, seedflow_binary
fetch=lambda what: subprocess.run([seedflow_binary(),"fetch",what],check=True,capture_output=True,text=True).stdout.strip()
srv, model = fetch("llama-server"), fetch("model")
tasks=[json.loads(l) for l in open(MBPP)][:4]
s=socket.socket(); s.bind(("127.0.0.1",0)); port=s.getsockname()[1]; s.close()
p=subprocess.Popen([srv,"--model",model,"--host","127.0.0.1","--port",str(port),"--parallel","8","--ctx-size",str(2048*8),"--threads","2","--no-jinja","--no-webui"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
url=f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if urllib.request.urlopen(url+"/health",timeout=1).status==200: break
    except OSError: time.sleep(0.2)
def req(task,n,seed,logprobs=True):
    body={"messages":[{"role":"user","content":task["text"]+"\n"+"\n".join(task["test_list"])}],"temperature":0.8,"max_tokens":128,"ignore_eos":True,"n":n,"seed":seed,"stream":True}
    if logprobs: body.update(logprobs=True,top_logprobs=1)
    r=urllib.request.Request(url+"/v1/chat/completions",data=json.dumps(body).encode(),headers={"content-type":"application/json"})
    toks=0
    with urllib.request.urlopen(r) as resp:
        for line in resp:
            line=line.decode().strip()
            if line.startswith("data:") and line[5:].strip()!="[DONE]":
                c=json.loads(line[5:])
                for ch in c.get("choices",[]):
                    if ch.get("delta",{}).get("content"): toks+=1
    return toks
def run(mode,logprobs=True):
    t=time.time()
    if mode=="n1":
        jobs=[(task,1,1000*i+j) for i,task in enumerate(tasks) for j in range(5)]
        with ThreadPoolExecutor(8) as ex: out=list(ex.map(lambda a: req(*a,logprobs=logprobs),jobs))
    else:
        with ThreadPoolExecutor(4) as ex: out=list(ex.map(lambda a: req(a[1],5,1000*a[0],logprobs),list(enumerate(tasks))))
    dt=time.time()-t
    return sum(out),dt
req(tasks[0],1,1)
for rnd in range(2):
    for mode in ["n1","n5"]:
        for lp in [True,False]:
            toks,dt=run(mode,lp); print(mode,"logprobs" if lp else "nolp",toks,round(dt,1),round(20*128/dt,1),flush=True)
p.kill()
