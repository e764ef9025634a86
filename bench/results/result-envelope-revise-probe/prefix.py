#!/usr/bin/env python3
"""Self-Revise with the answer prefilled with the model's own code: does continuing from its own
failing code (up to the line the error was raised at, or up to its first `return` for a wrong
value) give passing own-code edits? A probe outside seedflow, against a llama-server started on
the model with `--no-jinja` (its built-in ChatML, as seedflow renders prompts) on PORT:

    llama-server -m qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --port 8091 -np 8 -c 32768 --no-jinja &
    python3 prefix.py ERRORS.jsonl hint-none 4     # the shipped prompt (hint), no prefix
    python3 prefix.py ERRORS.jsonl hint-anchor 2   # the same, the answer prefilled

VARIANT is MODE-PREFIX: MODE off, hint or show (the step's `reference`), PREFIX none or anchor.

ERRORS.jsonl: a SEED run's `adapt/iteration-1/errors/output.jsonl`. Revisions are checked with the
native python3 (setup, program, tests); "own" = more similar (normalised Levenshtein, comments,
docstrings and module-level demo code stripped) to the error code than to the reference.
"""
import ast, concurrent.futures as cf, json, os, re, subprocess, sys, urllib.request

def lev(a,b):
    # normalised Levenshtein similarity like data::similarity
    if a==b: return 1.0
    n,m=len(a),len(b)
    prev=list(range(m+1))
    for i in range(1,n+1):
        cur=[i]+[0]*m
        ca=a[i-1]
        for j in range(1,m+1):
            cur[j]=min(prev[j]+1,cur[j-1]+1,prev[j-1]+(ca!=b[j-1]))
        prev=cur
    return 1-prev[m]/max(n,m)
def norm(code):
    try: t=ast.parse(code)
    except SyntaxError: return code
    body=[n for n in t.body if isinstance(n,(ast.FunctionDef,ast.ClassDef,ast.Import,ast.ImportFrom,ast.AsyncFunctionDef,ast.Assign))]
    # strip docstrings
    for n in ast.walk(ast.Module(body=body,type_ignores=[])):
        if isinstance(n,(ast.FunctionDef,ast.ClassDef,ast.AsyncFunctionDef)) and n.body and isinstance(n.body[0],ast.Expr) and isinstance(getattr(n.body[0],'value',None),ast.Constant) and isinstance(n.body[0].value.value,str):
            n.body=n.body[1:] or [ast.Pass()]
    return ast.unparse(ast.Module(body=body,type_ignores=[]))
ERR=sys.argv[1]; VARIANT=sys.argv[2]; N=int(sys.argv[3]) if len(sys.argv)>3 else 4
PORT=int(os.environ.get('PORT','8091'))
ROOT=os.path.join(os.path.dirname(os.path.abspath(__file__)),'..','..','..')
tmpl=open(ROOT+'/stdlib/prompts/revise.txt').read()
exs=[json.loads(l) for l in open(ROOT+'/stdlib/prompts/revise-examples.jsonl') if l.strip()]
def render(t, vals):
    out=''; rest=t
    while '{{' in rest:
        s=rest.index('{{'); out+=rest[:s]; after=rest[s+2:]; e=after.index('}}'); tag=after[:e].strip(); rest=after[e+2:]
        if tag.startswith('#'):
            name=tag[1:]; close='{{/%s}}'%name; inner,_,tail=rest.partition(close)
            if vals.get(name): out+=render(inner,vals)
            rest=tail
        else: out+=vals.get(tag,'')
    return out+rest
def failing_line(code, fb):
    F='File "<program>", line '
    i=fb.rfind(F)
    if i<0: return None
    m=re.match(r'\d+',fb[i+len(F):]); n=int(m.group())
    ls=code.split('\n')
    return n if 0<n<=len(ls) else None
def msg(req,tests,code,fb,mode,ref):
    code=code.rstrip(); n=failing_line(code,fb)
    lines='line %d: %s'%(n,code.split('\n')[n-1].strip()) if n and code.split('\n')[n-1].strip() else ''
    return render(tmpl,{'requirement':req.strip(),'tests':tests,'code':code,'feedback':fb.strip(),'lines':lines,
        'reference':ref.rstrip() if mode=='show' else '','hint':ref.rstrip() if mode=='hint' else ''})
SYS='<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n'
def chat(turns):
    s=SYS
    for u,a in turns: s+='<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n%s<|im_end|>\n'%(u,a)
    return s
def prefix_lines(code, fb, variant):
    """The error code's lines the answer is prefilled with: none, or up to its failing line
    (up to its first `return` for a wrong value)."""
    ls=code.rstrip().split('\n')
    if variant.endswith('none'): return []
    n=failing_line(code.rstrip(),fb)
    if n: return ls[:n-1]
    for j,l in enumerate(ls):
        if l.strip().startswith('return'): return ls[:j]
    return ls
def complete(prompt, seed):
    body=json.dumps({'prompt':prompt,'n_predict':512,'temperature':0.8,'top_p':0.95,'top_k':40,'min_p':0.0,'seed':seed,'stop':['<|im_end|>'],'cache_prompt':True}).encode()
    r=urllib.request.urlopen(urllib.request.Request('http://localhost:%d/completion'%PORT,body,{'Content-Type':'application/json'}))
    return json.loads(r.read())['content']
def extract(text):
    m=re.search(r'```(?:python)?\n(.*?)```',text,re.S)
    return m.group(1) if m else text
def run(code, task):
    prog=task.get('test_setup','')+'\n'+code+'\n'+'\n'.join(task['tests'])+'\n'
    try:
        p=subprocess.run([sys.executable,'-I','-c',prog],capture_output=True,timeout=5)
        return p.returncode==0
    except subprocess.TimeoutExpired: return False
errs=[json.loads(l) for l in open(ERR)]
mode=VARIANT.split('-')[0]
fewshot=[(msg(e['requirement'],'\n'.join(e['tests']),e['code'],e['feedback'],'off',''),'```python\n%s\n```'%e['revision'].rstrip()) for e in exs]
jobs=[]
for e in errs:
    t=e['task']; tests='\n'.join(t['tests'])
    m=msg(t['prompt'],tests,e['code'],e['feedback'],mode,t.get('reference') or '')
    for i in range(N):
        pre=prefix_lines(e['code'],e['feedback'],VARIANT)
        head='```python\n'+''.join(l+'\n' for l in pre)
        jobs.append((e,i,chat(fewshot)+'<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n'%m+head,head))
def work(j):
    e,i,p,head=j
    out=complete(p, 1000+i)
    code=extract(head+out)
    ok=run(code,e['task'])
    par=e['code']; ref=e['task'].get('reference') or ''
    return e['task_id'],i,ok,lev(norm(code),norm(par)),lev(norm(code),norm(ref)),len(head.split('\n'))-2
with cf.ThreadPoolExecutor(8) as ex: res=list(ex.map(work,jobs))
passed=[r for r in res if r[2]]
own=[r for r in passed if r[3]>r[4]]
fixed=set(r[0] for r in passed); ownfixed=set(r[0] for r in own)
print(VARIANT,'revisions',len(res),'passed',len(passed),'own',len(own),'problems fixed',len(fixed),'own-fixed',len(ownfixed))
